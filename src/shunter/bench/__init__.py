"""``shunter bench``: benchmark scenarios, each printed as one JSON object.

Layout: ``runner`` names the scenarios and runs them; ``context`` holds what they share
(broker, consumer settings, datasets produced once); ``events`` makes the gift stream;
``raw`` is the bare confluent-kafka baseline; ``dispatch`` serves shunter in-process and
times it from its first consumed batch to every offset settled (and committed, beside it).
One module per scenario family.
"""
