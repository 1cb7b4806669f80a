"""Lightning callbacks: reconstruction panels, run metadata in checkpoints."""
