"""Studies: thin compositions of the instruments. A config in, a tidy table and figures out; each writes
its results atomically and resumes where it stopped (``dit-probe run <study>``)."""
