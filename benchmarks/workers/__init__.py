"""Scripts the harness starts in worker processes; each writes one JSON result file."""
