"""Decode speed against the release's approach (see diffcoder/bench/decode.py for the flags).

    python benchmarks/decode.py --shape tiny --gen-length 256 --steps 256
Last line of output: one JSON object.
"""
from diffcoder.bench.decode import main

if __name__ == "__main__":
    main()
