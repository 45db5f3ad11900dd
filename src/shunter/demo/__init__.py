"""``shunter demo``: a zero-configuration tour on the embedded broker.

``stream`` makes a seeded live-revenue stream and says what it holds (its ``Plan``);
``topology`` is the deployment, written as YAML; ``handlers`` are the example
subscribers, one of them buggy; ``revenue`` runs the stream through them. ``crash``
replays the night of shunter's story: ``supervised`` runs the real ``shunter run`` on a
stream holding one message that kills the interpreter in ``crash_handlers``, and
``crashreport`` reads its log and checks the outcome. ``tour`` runs the steps in order.
"""

from .tour import Options, run

__all__ = ["Options", "run"]
