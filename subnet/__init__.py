"""The one-command local subnet: ledger, miners and validators on one machine (issue 7)."""
