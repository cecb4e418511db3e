"""Read training runs back and turn them into the paper's tables and figures."""
