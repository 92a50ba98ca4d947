from .local import *  # noqa: F401,F403
