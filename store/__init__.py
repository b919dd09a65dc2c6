"""The study store: the only code that writes SQL. Append-only Parquet segments a live reader can follow from
any process or node, consolidated into the study's DuckDB file at the end and on demand."""
