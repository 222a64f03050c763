"""The report page's fixed words and look: the caption under each figure (what
to look for in it) and the page's style sheet. Kept apart from the code that
lays the page out (stain_search.analysis.report), so the words can be read
and edited in one place."""

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem;
       margin-top: 2.2rem; }
.meta { color: #555; } figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.92rem; max-width: 60rem; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.8rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
tr.chosen td { background: #fff4e5; font-weight: 600; }
.note { background: #f6f8fa; border-left: 4px solid #999; padding: 0.5rem 0.8rem; }
.flag { background: #fff0f0; border-left: 4px solid #d62728; padding: 0.4rem 0.8rem;
        margin: 0.4rem 0; }
code { background: #f4f4f4; padding: 0 0.2rem; } .wide { overflow-x: auto; }
"""

CAPTIONS = {
    "importance": "Share of each objective's variation explained by each parameter "
                  "(fANOVA: random-forest variance decomposition; PED-ANOVA: how differently "
                  "the best trials' values are spread). Two methods that agree are worth "
                  "believing.",
    "param_effects": "Each searched parameter against each objective and the structure check. "
                     "Filled: complete trials; hollow: pruned (stopped early, values truncated). "
                     "The red star is the chosen trial. Look for a slope (an effect) or a "
                     "valley (a best range).",
    "pareto": "Blue: trials no other trial beats on both objectives. The chosen trial (star) "
              "holds the checkpoint to deploy: on the front, with the best first objective "
              "(the rule `stain-search best` and `export` follow).",
    "best_so_far": "Grey: every evaluated epoch of every trial, in the order they finished; "
                   "red: the best value so far. A curve still falling at the right end says "
                   "more trials would help.",
    "loss_curves": "Training losses per trial (epoch means). Discriminator losses falling to "
                   "zero while G's loss climbs is the classic sign of a winning discriminator; "
                   "colour follows the parameter that mattered most.",
    "schedules": "Population-based training: each member's mutated values over its epochs. "
                 "A dot is an exploit: the member took a better member's newest checkpoint "
                 "and values, then perturbed or resampled them within the space's bounds. "
                 "The schedule of the deployed checkpoint is in its export's provenance.",
    "confirmation": "`stain-search confirm` re-trained the top configurations with new seeds. "
                    "Blue: mean ± std over the new seeds; grey: each seed run (its best kept "
                    "checkpoint); red diamond: the search's own run, left out of the mean (it "
                    "was picked for being best). Bars that overlap cannot be told apart.",
    "top_trials_images": "The best trials' generators G on the same validation tiles. Compare "
                         "nuclei, fibres and lumens with the input: a good translation keeps "
                         "every structure and only changes its colour.",
}
