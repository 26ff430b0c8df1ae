"""`python -m distill.train RECIPE.yaml [a.b=value ...]` and `accelerate launch -m distill.train ...`."""

import sys

from distill.train.loop import main

sys.exit(main())
