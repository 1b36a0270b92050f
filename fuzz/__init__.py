"""Fuzzing harness for the parsers of untrusted input (``make fuzz``; not part of ``make test``)."""
