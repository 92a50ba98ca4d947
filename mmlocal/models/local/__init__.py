from .aux import *  # noqa: F401,F403
from .heads import *  # noqa: F401,F403
from .learner import LocalLearner

__all__ = ['LocalLearner']
