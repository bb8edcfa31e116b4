"""Training: flags (`arguments`) and the Accelerate loop (`loop`)."""
