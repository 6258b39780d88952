from bigvit.optim.param_groups import clean_name, param_groups
from bigvit.optim.schedule import SCHEDULES, apply_lr, lr_factor

__all__ = ["SCHEDULES", "apply_lr", "clean_name", "lr_factor", "param_groups"]
