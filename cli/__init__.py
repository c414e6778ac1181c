"""The `rwsfmt` command line (click + rich); all logic lives in the `rwsfmt` library."""
