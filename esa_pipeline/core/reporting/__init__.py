"""Charts (altair, pure) and the self-contained HTML report. Import submodules directly."""
