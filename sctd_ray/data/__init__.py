"""Target datasets: real image sources, the target task format, readers, preprocessing."""
