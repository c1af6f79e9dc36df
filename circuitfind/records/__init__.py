"""Records and outputs: circuit.json, atomic files, tracking, figures, reports, exports, sweeps."""
