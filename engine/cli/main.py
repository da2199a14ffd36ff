"""The ``freezeasguard`` command line: every subcommand's arguments, and the dispatch.

Each subcommand is a function ``cmd_*(args) -> exit code`` in one of ``cli.train``, ``cli.learn``,
``cli.proof``, ``cli.verify``, ``cli.service`` and a few small ones; only the module of the command being run
is imported, so ``--help`` is instant and ``keygen`` does not pay for diffusers. Errors the user can fix (a bad
config, bad data, a refused job, a failed proof) print one clear message and exit 2 (1 for a failed
proof), never a traceback. Nothing imports this package: it sits on top.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from freezeasguard.engine.errors import FreezeAsGuardError
from freezeasguard.engine.version import __version__


def _command(p: argparse.ArgumentParser, impl: str) -> None:
    """``impl`` is 'module:function' under freezeasguard.engine.cli, imported when the command runs."""
    p.set_defaults(impl=impl)


def _require(p: argparse.ArgumentParser, *groups: tuple[str, ...]) -> None:
    """Each group names options of which at least one must be given. A command that trains must not
    guess its data or its starting model: a silent default run is minutes of work nobody asked for."""
    p.set_defaults(required_one_of=(p, groups))


def _check_required(args: argparse.Namespace) -> None:
    parser, groups = getattr(args, "required_one_of", (None, ()))
    missing = [" or ".join(g) for g in groups
               if all(getattr(args, o.lstrip("-").replace("-", "_")) is None for o in g)]
    if missing:
        parser.error("the following arguments are required: " + ", ".join(missing))  # usage, exit 2


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="named config preset (tiny, small, sd15, sd21, sdxl-tiny, sdxl, sd3-tiny, sd3, "
                                     "flux-tiny, flux)")
    p.add_argument("--config", help="YAML or JSON config file (applied after the preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")


def _engine_commands(sub) -> None:
    _command(sub.add_parser("info", help="versions, device, and which optional backends are usable"), "train:cmd_info")

    s = sub.add_parser("finetune", help="fine-tune a model (full, or guarded by a freeze manifest)")
    _config_args(s)
    s.add_argument("--data", help="'digits' or an image folder with metadata.jsonl (required)")
    s.add_argument("--model", help="model folder in a diffusers pipeline layout to start from (this or --preset "
                                   "is required; --preset alone starts from random weights)")
    s.add_argument("--steps", type=int, help="training steps (default: the config's train.steps)")
    s.add_argument("--seed", type=int, help="seed of the weights, data order and noise (default: train.seed)")
    s.add_argument("--out", help="output folder (logs, checkpoints, final/)")
    s.add_argument("--resume", nargs="?", const="latest", help="resume from the latest (or a given) checkpoint")
    _command(s, "train:cmd_finetune")
    _require(s, ("--data",), ("--model", "--preset"))

    s = sub.add_parser("generate", help="sample images from a model folder")
    s.add_argument("--model", required=True, help="model folder in a diffusers pipeline layout")
    s.add_argument("--prompt", action="append", required=True, help="text prompt (repeatable)")
    s.add_argument("--num", type=int, default=1, help="images per prompt")
    s.add_argument("--steps", type=int, default=30, help="sampler steps (default 30)")
    s.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale (default 1.0: conditional prediction only)")
    s.add_argument("--sampler", default="ddim",
                   help="'ddim' (default), 'checkout' (the scheduler the model folder names) or a diffusers "
                        "scheduler class, e.g. DPMSolverMultistepScheduler")
    s.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    s.add_argument("--out", default="samples.png", help="PNG grid to write (default samples.png)")
    s.add_argument("--cell", type=int, default=128, metavar="PX",
                   help="smallest side of each sample in the grid, enlarged by whole pixels for viewing "
                        "(default 128; 0: the model's own resolution)")
    s.add_argument("--raw", help="also write the samples at the model's resolution, one PNG each, to this folder")
    _command(s, "train:cmd_generate")

    s = sub.add_parser("export-digits", help="write the built-in digits as an image folder with metadata.jsonl")
    s.add_argument("--out", required=True, help="folder to create (must not exist)")
    s.add_argument("--resolution", type=int, default=64, help="image side in pixels (default 64)")
    s.add_argument("--classes", help="comma-separated digits to keep, as numbers or words (default: all ten)")
    _command(s, "data:cmd_export_digits")


def _guard_commands(sub) -> None:
    s = sub.add_parser("learn-mask", help="learn a FreezeAsGuard mask and write it as a freeze manifest")
    s.add_argument("--base", required=True, help="base model folder (diffusers layout: SD, SDXL, SD3 or Flux)")
    s.add_argument("--data", required=True, help="'digits' or an image folder with a domain per image")
    s.add_argument("--illegal", required=True, metavar="D[,D..]", help="illegal domain(s)")
    s.add_argument("--innocent", required=True, metavar="D[:W][,D..]", help="innocent domain(s), optional weights")
    s.add_argument("--budget", type=float, required=True, help="freeze budget rho in [0, 1]")
    s.add_argument("--budget-by", choices=("params", "tensors"), default="params",
                   help="count the budget in parameters (default) or in tensors")
    s.add_argument("--out", required=True, help="manifest to write (JSON)")
    s.add_argument("--steps", type=int, help="total steps (user + mask)")
    s.add_argument("--bootstrap-steps", type=int, help="mixed fine-tuning steps giving theta_ft")
    s.add_argument("--finetuned", help="fine-tuned model folder to use as theta_ft (no bootstrap)")
    s.add_argument("--seed", type=int, help="seed of the bootstrap, batches and baselines (default: the config's)")
    s.add_argument("--work", help="folder for the log, checkpoints and bootstrap model (default: OUT.run)")
    s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the work folder")
    s.add_argument("--baselines", action="store_true",
                   help="also write random, magnitude and saliency masks at the same budget (OUT.<name>.json)")
    s.add_argument("--config", help="YAML or JSON file of mask-learning settings")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set mask.lr=0.1 (repeatable)")
    _command(s, "learn:cmd_learn_mask")

    s = sub.add_parser("learn-lock", help="learn direction locks (the subspaces illegal fine-tuning uses) "
                                          "and write them as a manifest")
    s.add_argument("--base", required=True, help="base model folder (diffusers layout: SD, SDXL, SD3 or Flux)")
    s.add_argument("--data", required=True, help="'digits' or an image folder with a domain per image")
    s.add_argument("--illegal", required=True, metavar="D[,D..]", help="illegal domain(s)")
    s.add_argument("--innocent", metavar="D[,D..]", help="innocent domain(s) (needed by --select contrast)")
    s.add_argument("--out", required=True, help="folder for the manifest, its locks file and the report")
    s.add_argument("--budget", type=float, help="share of each matrix's side to lock (default 0.3)")
    s.add_argument("--side", choices=("out", "in", "both"), help="output directions, input ones, or both")
    s.add_argument("--rounds", type=int, help="adversarial rounds (1 = one-shot; default 3)")
    s.add_argument("--select", choices=("energy", "contrast"), help="how directions are chosen")
    s.add_argument("--steps", type=int, help="steps of each round's fine-tune (the service's cap)")
    s.add_argument("--lr", type=float, help="learning rate of each round's fine-tune (the service's cap)")
    s.add_argument("--batch-size", type=int, help="batch of each round's fine-tune (the service's cap)")
    s.add_argument("--mask", help="a freeze manifest whose tensor mask the lock is combined with")
    s.add_argument("--seed", type=int, help="seed of each round's fine-tune (default: the config's)")
    s.add_argument("--resume", action="store_true", help="continue after the last finished round in --out")
    s.add_argument("--config", help="YAML or JSON file of lock-learning settings")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set contrast_ridge=0.3 (repeatable)")
    _command(s, "learn:cmd_learn_lock")

    s = sub.add_parser("mask-report", help="where a mask's frozen tensors sit; overlap of two masks")
    s.add_argument("manifest", help="freeze manifest (JSON)")
    s.add_argument("other", nargs="?", help="a second manifest to compare against (Jaccard overlap)")
    s.add_argument("--png", help="also draw the report to this PNG")
    _command(s, "report:cmd_mask_report")

    s = sub.add_parser("keygen", help="make a publisher key for signing manifests")
    s.add_argument("--out", required=True, help="key file to write (0600)")
    s.add_argument("--algorithm", choices=["hmac-sha256", "ed25519"], default="ed25519",
                   help="ed25519 (default: the service needs only the public half) or hmac-sha256 (a shared secret)")
    s.add_argument("--public", help="ed25519: also write the public half here (what the service verifies with)")
    _command(s, "proof:cmd_keygen")

    s = sub.add_parser("sign", help="sign a freeze manifest with a publisher key")
    s.add_argument("--manifest", required=True, help="freeze manifest to sign (JSON)")
    s.add_argument("--key", required=True, help="publisher key file (from keygen: the private one)")
    s.add_argument("--out", help="signed manifest (default: in place, atomically)")
    _command(s, "proof:cmd_sign")

    s = sub.add_parser("verify", help="prove every frozen tensor of a model is bit-identical to the manifest "
                                      "(and every locked direction unmoved)")
    s.add_argument("--manifest", required=True, help="freeze manifest (JSON)")
    s.add_argument("--model", required=True, help="model folder, its unet/ or transformer/, or a .safetensors file")
    s.add_argument("--base", help="the base model folder (needed when the manifest locks directions)")
    s.add_argument("--steps", type=int, default=10_000,
                   help="fine-tuning steps the fp32 tolerance of a lock allows for (default 10000)")
    _command(s, "verify:cmd_verify")


def _service_commands(sub) -> None:
    job = sub.add_parser("job", help="guarded fine-tuning jobs (policy-checked, proven, logged)")
    jsub = job.add_subparsers(dest="job_command", required=True)
    s = jsub.add_parser("submit", help="review a job against the policy, run it, prove the freeze held")
    s.add_argument("spec", help="job spec (YAML or JSON)")
    s.add_argument("--policy", required=True, help="publisher policy (YAML or JSON)")
    s.add_argument("--manifest", required=True, help="signed freeze manifest (JSON)")
    s.add_argument("--base", required=True, help="base model folder (diffusers layout: SD, SDXL, SD3 or Flux)")
    s.add_argument("--out", help="job output folder (default runs/jobs/<job id>; must not exist)")
    s.add_argument("--log", help="hash-chained job log (default: jobs.jsonl next to the output folder)")
    _command(s, "service:cmd_job_submit")

    pol = sub.add_parser("policy", help="the publisher's job policy")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    s = psub.add_parser("init", help="write a policy that pins the base model folder and the manifests jobs may "
                                     "run under, with the default caps")
    s.add_argument("--manifest", required=True, action="append",
                   help="a signed manifest jobs may run under (repeat for several; all for the same base)")
    s.add_argument("--key-file", required=True, help="key that verifies manifest signatures (ed25519: the public half)")
    s.add_argument("--log-key", required=True,
                   help="the service's own key that signs every job-log entry (ed25519 private key or hmac secret)")
    s.add_argument("--base", required=True, help="the base model folder: every file pinned, checked against the "
                                                 "manifests, its text encoder pinned too")
    s.add_argument("--out", required=True, help="policy file to write (YAML; must not exist)")
    s.add_argument("--max-lr", type=float, help="cap on a job's update scale (default 1e-4)")
    s.add_argument("--max-steps", type=int, help="cap on a job's training steps (default 2000)")
    s.add_argument("--max-batch-size", type=int, help="cap on a job's batch size (default 16)")
    s.add_argument("--min-guard-share", type=float,
                   help="least share of the denoiser's parameters a manifest must freeze or lock")
    _command(s, "service:cmd_policy_init")

    s = sub.add_parser("audit", help="verify a job log's hash chain, signatures and records")
    s.add_argument("log", help="job log (JSONL)")
    s.add_argument("--outputs", action="store_true", help="also re-hash every recorded delta file")
    s.add_argument("--head", help="expected hash of the newest record, kept elsewhere (anchors the tail: "
                                  "detects the newest records being deleted)")
    keys = s.add_mutually_exclusive_group()
    keys.add_argument("--key", metavar="FILE", help="the service's log verification key (its public Ed25519 PEM "
                                                    "or the HMAC secret); without it signatures are not checked")
    keys.add_argument("--policy", metavar="FILE", help="the service policy: verify with its log_key_file and "
                                                       "require its signature.key_file's key id on every manifest")
    _command(s, "proof:cmd_audit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freezeasguard",
                                description="Guarded fine-tuning of text-to-image diffusion models.")
    p.add_argument("--version", action="version", version=f"freezeasguard {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    _engine_commands(sub)  # info, finetune, generate, export-digits
    _guard_commands(sub)  # learn-mask, mask-report, keygen, sign, verify
    _service_commands(sub)  # job submit, policy init, audit
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_required(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    module, func = args.impl.split(":")
    try:
        cmd = getattr(importlib.import_module(f"freezeasguard.engine.cli.{module}"), func)
        return int(cmd(args) or 0)
    except (FreezeAsGuardError, FileNotFoundError) as e:
        print(f"freezeasguard {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
