from bigvit.optim.param_groups import clean_name, param_groups
from bigvit.optim.schedule import SCHEDULES, apply_lr, decay_start, lr_factor, schedule_args

__all__ = [
    "SCHEDULES",
    "apply_lr",
    "clean_name",
    "decay_start",
    "lr_factor",
    "param_groups",
    "schedule_args",
]
