"""The README's generated results: its result tables and the figures its prose quotes, one module per
README section (each with its BLOCKS and FIGURES), assembled by benchmarks/readme_tables.py.
"""
