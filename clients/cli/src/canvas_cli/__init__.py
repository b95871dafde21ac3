"""canvas-jobs command line client (`canvas-jobs`)."""
