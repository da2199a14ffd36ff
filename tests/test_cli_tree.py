"""The command tree itself: every command has a handler that exists, every option says what it
does, a training command names its data and model, and a typo is reported before torch loads."""
import argparse
import importlib
import subprocess
import sys

import pytest

from freezeasguard.engine.cli.main import build_parser
from freezeasguard.engine.cli.main import main as cli_main


def _leaves(parser: argparse.ArgumentParser, path=()):
    """(command path, parser) of every command that runs something (no further subcommands)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaves(sub, (*path, name))


def _all_parsers(parser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))


LEAVES = list(_leaves(build_parser()))


def test_the_tree_has_the_commands_this_test_walks():
    names = {" ".join(p) for p, _ in LEAVES}
    assert {"finetune", "generate", "verify", "job submit", "policy init", "audit", "learn-lock"} <= names
    assert len(names) >= 13


@pytest.mark.parametrize("path,parser", LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_every_command_resolves_to_an_existing_handler(path, parser):
    impl = parser.get_default("impl")
    assert impl, f"`freezeasguard {' '.join(path)}` names no handler"
    module, func = impl.split(":")
    handler = getattr(importlib.import_module(f"freezeasguard.engine.cli.{module}"), func, None)
    assert callable(handler), f"`freezeasguard {' '.join(path)}`: no function {func} in cli.{module}"


def test_every_option_and_command_has_help_text():
    missing = []
    for path, parser in _all_parsers(build_parser()):
        where = "freezeasguard " + " ".join(path) if path else "freezeasguard"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{where} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "options without help text:\n" + "\n".join(missing)


@pytest.mark.parametrize("argv,missing", [
    ([], "--data, --model or --preset"),
    (["--preset", "tiny"], "--data"),
    (["--data", "digits"], "--model or --preset"),
])
def test_finetune_without_its_data_or_model_prints_the_usage_and_exits_2(capsys, argv, missing):
    with pytest.raises(SystemExit) as exc:
        cli_main(["finetune", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: freezeasguard finetune")
    assert f"error: the following arguments are required: {missing}\n" in err


def test_a_config_typo_is_reported_before_torch_is_imported(tmp_path):
    code = ("import sys\n"
            "from freezeasguard.engine.cli.main import main\n"
            "rc = main(['finetune', '--preset', 'tiny', '--data', 'digits', '--set', 'train.lrr=1',"
            f" '--out', {str(tmp_path / 'o')!r}])\n"
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("freezeasguard finetune: error: unknown config key 'train.lrr'; "
                                "did you mean 'lr'?")
    assert r.stdout.strip() == "torch not loaded"
    assert not (tmp_path / "o").exists()
