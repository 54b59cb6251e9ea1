"""The child process of one isolated benchmark run: `python -m deltatune.apps.bench RUN_SPEC_JSON`."""

import json
import sys

from deltatune.apps.bench.run import execute, spec_from_json

if __name__ == "__main__":
    print(json.dumps(execute(spec_from_json(sys.argv[1]))))
