"""Every method on the study budget (``configs/study.py``), three seeds.

``python -m qat_jax.compare --config=configs/compare_study.py --workdir=runs/compare_study``

``configs/compare_default.py`` with the study's base: one FP model per seed, and every QAT method
gets the same 2,250 stage steps (``total_stage_steps``) plus the 400 final steps. Rerunning the
command resumes.
"""

import ml_collections

from qat_jax.train.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "compare_default.py")
    c.base = load_sibling(__file__, "study.py")
    c.base.progress = False
    c.total_stage_steps = 2250
    c.lock()
    return c
