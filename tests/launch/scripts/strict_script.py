"""Launcher test script with a strict parser that does not know --local_rank."""
import argparse

p = argparse.ArgumentParser()
p.add_argument("out")
p.parse_args()
