"""The first stage of dvc.yaml: validate the whole params file before any stage can lose its outputs.

    python -m pipelines.check_params --params params.yaml --out artifacts/params/valid.txt

DVC deletes a stage's outputs just before it runs the stage, so a typo that only the stage itself would catch
(``extract.num_frames: four``, ``train.epoch: 12``) used to cost the outputs of the last good run. This stage
tracks the whole file (``params: - params.yaml:`` in dvc.yaml: any change reruns it, including a section no
stage reads, such as ``trian:``) and every other stage depends on its output, so ``dvc repro`` stops here, with
one line naming the file and key, before anything is deleted.

Its output is the same bytes for every valid file, so DVC still decides what reruns from each stage's own
params: a valid change reruns this stage (a fraction of a second, no Prefect) and the stages that read the
changed keys, nothing else. Exit status: 0 valid; 2 invalid (the error names the key).
"""

from __future__ import annotations

import argparse
import sys

from seqvision.config import ConfigError, load_params
from seqvision.io import write_text
from seqvision.study.params import study_config

VALID = "params.yaml passed validation (python -m pipelines.check_params)\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.check_params", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--out", required=True, help="marker file written when the params are valid")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        try:  # the study's knobs are validated by the study's code (seqvision.study.params)
            study_config(params.study)
        except ConfigError as err:
            raise ConfigError(f"{args.params}: {err}") from None
    except ConfigError as err:
        print(f"check_params: error: {err}", file=sys.stderr)
        return 2
    write_text(args.out, VALID)
    return 0


if __name__ == "__main__":
    sys.exit(main())
