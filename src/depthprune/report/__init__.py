"""The report of a sweep: statistics, figures, tables and one HTML file."""
