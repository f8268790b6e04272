"""Entry point: `python train.py [overrides]`. Everything lives in reinforce_cot.main (see its docstring)."""

from reinforce_cot.main import main

if __name__ == "__main__":
    main()
