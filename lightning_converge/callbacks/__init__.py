"""Lightning callbacks of this pack; import them from here."""

from lightning_converge.callbacks.anneal import Anneal
from lightning_converge.callbacks.ema import EMA
from lightning_converge.callbacks.grades import GradES
from lightning_converge.callbacks.grokfast import Grokfast
from lightning_converge.callbacks.lawa import LAWA
from lightning_converge.callbacks.posthoc_ema import PostHocEMA
from lightning_converge.callbacks.schedule_free import ScheduleFreeMode
