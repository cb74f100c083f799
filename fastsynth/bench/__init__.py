"""fastsynth.bench."""
