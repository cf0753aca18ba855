"""Talk to a ``generate_gpt.py --port`` server, as Megatron-LM's ``tools/text_generation_cli.py``:

    python tools/text_generation_cli.py localhost:5000

See megatron_ext/generation/client.py.
"""

import os
import sys

# Run from a checkout as Megatron-LM's tools are (python tools/...): the repository is the parent.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.generation.client import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
