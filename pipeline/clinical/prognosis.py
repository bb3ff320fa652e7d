"""A cited, rule-based prognosis summary from the CST asymmetry and, when known, PREP2.

Research use only, not a medical device. The imaging tier follows the PREP
algorithm's MRI step (Stinear et al. 2012): it applies to patients whose
paretic upper limb has no motor-evoked potential (MEP−) on TMS, which imaging
alone cannot tell, so the summary says what the asymmetry would mean in that
case and what else is needed.

When the participant's SAFE score, age, MEP status and NIHSS are known
(:mod:`pipeline.clinical.participants`), the PREP2 decision tree (Stinear et al. 2017) gives
its prediction of upper-limb function 3 months after the stroke; PREP2 uses no
imaging, so it stands beside the imaging tier, not instead of it.

Both were made for stroke. For a motor neuron disease (``diagnosis`` in
participants.tsv: ALS, PLS, MND) neither is applied; the tract FA at the internal
capsule and the cerebral peduncle is set beside cut-offs published for ALS, as
context only.
"""

import re

from ..cst import SIDES

DISCLAIMER = ("Research use only — not a medical device. Not for diagnosis or treatment "
              "decisions.")

REFERENCES = {
    "stinear2007": ("Stinear CM, Barber PA, Smale PR, Coxon JP, Fleming MK, Byblow WD. "
                    "Functional potential in chronic stroke patients depends on corticospinal "
                    "tract integrity. Brain 2007;130:170–180. doi:10.1093/brain/awl333"),
    "stinear2012": ("Stinear CM, Barber PA, Petoe M, Anwar S, Byblow WD. The PREP algorithm "
                    "predicts potential for upper limb recovery after stroke. Brain "
                    "2012;135:2527–2535. doi:10.1093/brain/aws146"),
    "stinear2017": ("Stinear CM, Byblow WD, Ackerley SJ, Smith MC, Borges VM, Barber PA. "
                    "PREP2: A biomarker-based algorithm for predicting upper limb function "
                    "after stroke. Ann Clin Transl Neurol 2017;4:811–820. "
                    "doi:10.1002/acn3.488"),
    "werring2000": ("Werring DJ, Toosy AT, Clark CA, et al. Diffusion tensor imaging can detect "
                    "and quantify corticospinal tract degeneration after stroke. J Neurol "
                    "Neurosurg Psychiatry 2000;69:269–272. doi:10.1136/jnnp.69.2.269"),
}

#: PREP cut-off on the PLIC FA asymmetry for MEP− patients (``--prep-plic-ai``). 0.25 is the
#: value this project has cited to both Stinear et al. 2007 (chronic patients) and the PREP
#: algorithm of Stinear et al. 2012 (within days of the stroke), but it has not been checked
#: against either paper's full text (not reachable when last looked for, 2026-12): whether
#: the 2012 algorithm uses the 2007 study's 0.25 or another value (0.15 has been suggested)
#: is open. Check the 2012 paper's algorithm figure before relying on this default.
DEFAULT_PREP_PLIC_AI = 0.25
#: PREP2 cut-offs (Stinear et al. 2017): SAFE score (0-10) on day 3 from which Excellent or
#: Good is predicted without TMS; SAFE score from which the prediction is Excellent at any
#: age; age (years) from which a SAFE score below that gives Good instead of Excellent;
#: NIHSS on day 3 from which an MEP− patient is predicted Poor rather than Limited.
DEFAULT_PREP2_THRESHOLDS = {"prep2_safe": 5.0, "prep2_safe_any_age": 8.0, "prep2_age": 80.0,
                            "prep2_nihss": 7.0}

#: Tract FA at or below which ALS was reported at 3 T (PMID 26221413): scanner- and
#: method-dependent, so shown as context only, never as a finding.
MND_FA_CUTOFFS = {"internal_capsule": 0.7085, "cerebral_peduncle": 0.686}
MND_SOURCE = "PMID 26221413 (3 T; meta-analytic AUC of CST DTI in ALS about 0.75)"
_MOTOR_NEURON_DISEASE = re.compile(
    r"\b(als|pls|mnd|amyotrophic lateral sclerosis|primary lateral sclerosis|"
    r"motor neuron(e)? disease)\b", re.IGNORECASE)

LMN_NOTE = ("Lower-motor-neuron involvement is not assessable by brain diffusion MRI.")


def prep2_prediction(clinical, thresholds=None):
    """The PREP2 decision tree (Stinear et al. 2017) on a participant's bedside scores.

    Step 1: SAFE ≥ ``prep2_safe`` → Excellent, unless the patient is at least
    ``prep2_age`` years old with SAFE < ``prep2_safe_any_age`` → Good.
    Step 2 (SAFE below): MEP+ → Good. Step 3 (MEP−): NIHSS < ``prep2_nihss``
    → Limited, else Poor.

    Parameters
    ----------
    clinical : dict or None
        ``safe_score``, ``age``, ``mep_status`` ("positive"/"negative"),
        ``nihss``; a missing key or None means not known
        (:func:`pipeline.clinical.participants.read_clinical_scores`).
    thresholds : dict, optional
        Overrides of :data:`DEFAULT_PREP2_THRESHOLDS`.

    Returns
    -------
    dict
        ``prediction``: "Excellent", "Good", "Limited", "Poor", or None when a
        score the tree needs is missing (listed in ``missing``); ``steps``: the
        decisions taken, each with its score and cut-off; ``thresholds``;
        ``source``.
    """
    limits = {**DEFAULT_PREP2_THRESHOLDS, **(thresholds or {})}
    known = {k: v for k, v in (clinical or {}).items() if v is not None}
    safe, age = known.get("safe_score"), known.get("age")
    mep, nihss = known.get("mep_status"), known.get("nihss")
    steps, missing, prediction = [], [], None
    if safe is None:
        missing.append("safe_score")
    elif safe >= limits["prep2_safe"]:
        steps.append(f"Step 1: SAFE score {safe:g} ≥ {limits['prep2_safe']:g}: no TMS needed.")
        if safe >= limits["prep2_safe_any_age"]:
            prediction = "Excellent"
            steps.append(f"SAFE score {safe:g} ≥ {limits['prep2_safe_any_age']:g}: Excellent "
                         f"at any age.")
        elif age is None:
            missing.append("age")
        elif age < limits["prep2_age"]:
            prediction = "Excellent"
            steps.append(f"Age {age:g} < {limits['prep2_age']:g} years: Excellent.")
        else:
            prediction = "Good"
            steps.append(f"Age {age:g} ≥ {limits['prep2_age']:g} years with SAFE score "
                         f"< {limits['prep2_safe_any_age']:g}: Good.")
    else:
        steps.append(f"Step 1: SAFE score {safe:g} < {limits['prep2_safe']:g}: TMS needed.")
        if mep is None:
            missing.append("mep_status")
        elif mep == "positive":
            prediction = "Good"
            steps.append("Step 2: upper-limb MEP present (MEP+): Good.")
        else:
            steps.append("Step 2: no upper-limb MEP (MEP−): NIHSS decides.")
            if nihss is None:
                missing.append("nihss")
            elif nihss < limits["prep2_nihss"]:
                prediction = "Limited"
                steps.append(f"Step 3: NIHSS {nihss:g} < {limits['prep2_nihss']:g}: Limited.")
            else:
                prediction = "Poor"
                steps.append(f"Step 3: NIHSS {nihss:g} ≥ {limits['prep2_nihss']:g}: Poor.")
    return {"prediction": prediction, "steps": steps, "missing": missing,
            "thresholds": limits, "source": REFERENCES["stinear2017"]}


def is_motor_neuron_disease(diagnosis):
    """True when the free-text diagnosis names ALS, PLS or another motor neuron disease."""
    return bool(diagnosis) and _MOTOR_NEURON_DISEASE.search(diagnosis) is not None


def motor_neuron_disease_context(fa_by_level, diagnosis):
    """Tract FA at the internal capsule and peduncle beside published ALS cut-offs.

    Parameters
    ----------
    fa_by_level : dict
        side -> {level: mean tract FA over the profile nodes of that level}.
    diagnosis : str

    Returns
    -------
    dict
        ``label`` (context only), ``diagnosis``, ``cutoffs``, ``values`` and
        ``at_or_below`` (side -> level -> FA / bool, None where the tract does not
        reach the level), ``statements``, ``source``.
    """
    values, below, statements = {}, {}, []
    for side in SIDES:
        values[side], below[side] = {}, {}
        for level, cutoff in MND_FA_CUTOFFS.items():
            fa = (fa_by_level.get(side) or {}).get(level)
            values[side][level] = fa
            below[side][level] = None if fa is None else fa <= cutoff
            name = level.replace("_", " ")
            statements.append(
                f"{side.capitalize()} CST FA at the {name}: not measured." if fa is None else
                f"{side.capitalize()} CST FA at the {name}: {fa:.3f} "
                f"({'at or below' if fa <= cutoff else 'above'} the reported ALS cut-off "
                f"{cutoff:g}).")
    return {"label": "context only: published cut-offs from other scanners and methods, not "
                     "a diagnostic test", "diagnosis": diagnosis, "cutoffs": dict(MND_FA_CUTOFFS),
            "values": values, "at_or_below": below, "statements": statements,
            "source": MND_SOURCE}


def _prep2_sentence(prep2):
    if prep2["prediction"] is not None:
        return (f"PREP2 (Stinear et al. 2017) on this participant's bedside scores predicts "
                f"'{prep2['prediction']}' upper-limb function at 3 months.")
    return ("PREP2 (Stinear et al. 2017) could not be applied: participants.tsv lacks "
            + ", ".join(prep2["missing"]) + ".")


def prognosis_summary(localization, fa_ai_plic, *, prep_plic_ai=DEFAULT_PREP_PLIC_AI,
                      qc_reasons=(), clinical=None, prep2_thresholds=None, fa_by_level=None):
    """Summarise what the CST asymmetry means for motor recovery.

    Parameters
    ----------
    localization : dict from :func:`pipeline.tractometry.localization.localize_damage`
    fa_ai_plic : float
        AI = (FA_L − FA_R)/(FA_L + FA_R) over the PLIC ROIs. Its magnitude equals
        Stinear's (FA_contra − FA_ipsi)/(FA_contra + FA_ipsi) when the lesion
        is on the side with the lower FA.
    prep_plic_ai : float
        PREP cut-off on the PLIC FA asymmetry (see :data:`DEFAULT_PREP_PLIC_AI`: its
        value in the published algorithm is still to be checked).
    qc_reasons : sequence of str
        Why the CST could not be assessed, if it could not.
    clinical : dict, optional
        The participant's PREP2 scores (see :func:`prep2_prediction`); without
        any, the summary carries no PREP2 statement.
    prep2_thresholds : dict, optional
        Overrides of :data:`DEFAULT_PREP2_THRESHOLDS`.
    fa_by_level : dict, optional
        side -> {level: tract FA}, for the motor-neuron-disease context.

    Returns
    -------
    dict with ``category, summary, rationale (list), references (list),
    thresholds, disclaimer``, ``prep2`` (:func:`prep2_prediction`, or None when no
    bedside score is known or the diagnosis is not a stroke) and ``context``
    (:func:`motor_neuron_disease_context` for ALS and the like, else None).
    """
    clinical = clinical or {}
    diagnosis = clinical.get("diagnosis")
    if is_motor_neuron_disease(diagnosis):
        return _motor_neuron_disease_summary(localization, fa_ai_plic, prep_plic_ai, qc_reasons,
                                             diagnosis, fa_by_level or {})
    scores = {k: v for k, v in clinical.items() if k != "diagnosis"}
    has_scores = any(v is not None for v in scores.values())
    prep2 = prep2_prediction(scores, prep2_thresholds) if has_scores else None
    summary = _imaging_summary(localization, fa_ai_plic, prep_plic_ai, qc_reasons)
    summary["prep2"] = prep2
    summary["context"] = None
    mep = (clinical or {}).get("mep_status")
    if summary["category"].startswith("umn_damage_plic_asymmetry_") and mep is not None:
        summary["rationale"].append(
            "This participant is MEP− (participants.tsv): the PREP MRI step applies."
            if mep == "negative" else
            "This participant is MEP+ (participants.tsv): the PREP MRI step does not apply; "
            "PREP predicts at least 'Notable' recovery for MEP+ patients.")
    if prep2 is not None:
        summary["summary"] += " " + _prep2_sentence(prep2)
        summary["rationale"] += ["PREP2: " + step for step in prep2["steps"]]
        summary["references"].append(prep2["source"])
        summary["thresholds"].update(prep2["thresholds"])
    return summary


def _motor_neuron_disease_summary(localization, fa_ai_plic, prep_plic_ai, qc_reasons,
                                  diagnosis, fa_by_level):
    """The imaging finding without the stroke rules, and the ALS cut-offs as context."""
    summary = _imaging_summary(localization, fa_ai_plic, prep_plic_ai, qc_reasons)
    summary.update(prep2=None, context=None, references=[], thresholds={})
    not_stroke = (f"PREP and PREP2 were made for stroke; they are not applied to "
                  f"'{diagnosis}'.")
    if summary["category"] == "not_assessable":
        summary["rationale"].append(not_stroke)
        return summary
    context = motor_neuron_disease_context(fa_by_level, diagnosis)
    if localization.get("umn_damage"):
        side = localization["affected_side"]
        level = (localization.get("level") or "unknown level").replace("_", " ")
        summary["category"] = "umn_damage"
        other = "right" if side == "left" else "left"
        summary["summary"] = (f"Reduced FA along the {side} CST relative to the {other}, peak "
                              f"at the {level}. {LMN_NOTE}")
        summary["rationale"] = [f"Reduced FA along the {side} CST, peak at the {level}."]
    summary["summary"] += (" In motor neuron disease both tracts may be affected alike, which "
                           "an asymmetry cannot show; see the context below.")
    summary["rationale"] += [not_stroke, f"Context ({context['label']}):", *context["statements"]]
    summary["references"] = [MND_SOURCE]
    summary["thresholds"] = {f"als_fa_{k}": v for k, v in MND_FA_CUTOFFS.items()}
    summary["context"] = context
    return summary


def _imaging_summary(localization, fa_ai_plic, prep_plic_ai, qc_reasons):
    """The imaging tier: UMN damage and what the PLIC asymmetry means under PREP (2012)."""
    refs = [REFERENCES["stinear2007"], REFERENCES["stinear2012"]]
    thresholds = {"prep_plic_ai": prep_plic_ai}
    if not localization.get("assessable", True):
        return {"category": "not_assessable",
                "summary": "The CST could not be assessed; no statement on UMN damage or "
                           "recovery from imaging is made.",
                "rationale": list(qc_reasons) or ["Quality control failed."],
                "references": [], "thresholds": thresholds, "disclaimer": DISCLAIMER}
    magnitude = abs(fa_ai_plic) if fa_ai_plic == fa_ai_plic else None  # NaN-safe
    plic_text = (f"PLIC FA asymmetry |AI| = {magnitude:.3f} (PREP cut-off {prep_plic_ai:g})."
                 if magnitude is not None else "PLIC FA asymmetry could not be measured.")
    if not localization.get("umn_damage"):
        return {"category": "no_imaging_evidence_of_umn_damage",
                "summary": "No imaging evidence of upper-motor-neuron damage along either "
                           "corticospinal tract. " + LMN_NOTE,
                "rationale": ["No segment of the FA asymmetry profile exceeded the detection "
                              "threshold.", plic_text,
                              "Healthy left-right CST FA is nearly symmetric (Werring et al. "
                              "2000)."],
                "references": refs + [REFERENCES["werring2000"]], "thresholds": thresholds,
                "disclaimer": DISCLAIMER}
    side = localization["affected_side"]
    level = (localization.get("level") or "unknown level").replace("_", " ")
    rationale = [f"Reduced FA along the {side} CST, peak at the {level}.", plic_text]
    if magnitude is None:
        category = "umn_damage_plic_asymmetry_not_measurable"
        summary = (f"UMN damage shows along the {side} CST (affecting the "
                   f"{'right' if side == 'left' else 'left'} body side). The PLIC FA asymmetry "
                   f"could not be measured, so the PREP MRI step cannot be applied.")
    elif magnitude >= prep_plic_ai:
        category = "umn_damage_plic_asymmetry_at_or_above_prep_cutoff"
        summary = (f"UMN damage shows along the {side} CST (affecting the "
                   f"{'right' if side == 'left' else 'left'} body side). The PLIC FA asymmetry "
                   f"is at or above the PREP cut-off: in a patient without upper-limb MEPs, "
                   f"PREP predicts little or no upper-limb recovery ('None').")
        rationale.append("PREP (Stinear et al. 2012): MEP− and PLIC asymmetry ≥ cut-off → "
                         "'None'; MEP status is required to apply this.")
    else:
        category = "umn_damage_plic_asymmetry_below_prep_cutoff"
        summary = (f"UMN damage shows along the {side} CST (affecting the "
                   f"{'right' if side == 'left' else 'left'} body side). The PLIC FA asymmetry "
                   f"is below the PREP cut-off: in a patient without upper-limb MEPs, PREP "
                   f"predicts potential for limited recovery ('Limited').")
        rationale.append("PREP (Stinear et al. 2012): MEP− and PLIC asymmetry < cut-off → "
                         "'Limited'; MEP status is required to apply this.")
    rationale.append(LMN_NOTE)
    return {"category": category, "summary": summary, "rationale": rationale,
            "references": refs, "thresholds": thresholds, "disclaimer": DISCLAIMER}
