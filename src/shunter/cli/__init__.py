"""The ``shunter`` command line: one module per command."""
