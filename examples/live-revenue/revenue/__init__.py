"""The live-revenue example's own code: handlers and models named by shunter.yaml."""
