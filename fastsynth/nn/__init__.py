"""fastsynth.nn."""
