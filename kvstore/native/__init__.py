"""Optional native helpers, compiled on first use (a C compiler is optional)."""
