from .local import *  # noqa: F401,F403
from .gso_yolo import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
from .repl import *  # noqa: F401,F403
