"""The reliability suite (issue 6, parts 3 and 4): R1-R5 as plain scenario functions that
return their figures, a fast tier for CI (test_fast_tier.py) and a long tier
(scripts/reliability). See README.md."""
