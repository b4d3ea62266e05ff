"""Combining miners' pseudo-gradients: compression, the outer optimizer, (later) hivemind."""
