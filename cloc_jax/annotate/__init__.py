"""Pseudo-labelling: caption phrases -> detector boxes -> filtered region labels, run on Apache Beam."""
