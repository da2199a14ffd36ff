"""What a guard locks, how it is enforced, and how it is proven: the name-keyed tensor mask
(``mask``), the hashed manifest that binds it to one base model (``manifest``, ``hashing``), the
proof after a job (``verify``), and the tensor guard in force during training (``tensor``,
``frozen_ops``)."""
from freezeasguard.engine.backends import quiet_import_warnings

quiet_import_warnings()
