"""Command-line interface (Typer). The only place that prints or exits."""
