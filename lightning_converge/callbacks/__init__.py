"""Lightning callbacks of this pack; import them from here."""

from lightning_converge.callbacks.anneal import Anneal
