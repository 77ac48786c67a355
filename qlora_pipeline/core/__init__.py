"""The bottom layer: names and paths (layout), errors, the job's policy, the machine's facts,
the memory estimates, seeding and the JSON files every stage writes. Imports nothing else of
the project (docs/architecture.md, "Layers")."""
