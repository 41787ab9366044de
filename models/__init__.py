"""Networks and diffusion maths. No file I/O and no configuration dictionaries live here."""
