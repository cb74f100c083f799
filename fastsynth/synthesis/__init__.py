"""fastsynth.synthesis."""
