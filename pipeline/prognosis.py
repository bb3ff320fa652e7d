"""A first, cited, rule-based prognosis summary from the CST asymmetry.

Research use only, not a medical device. The imaging tier follows the PREP
algorithm's MRI step (Stinear et al. 2012): it applies to patients whose
paretic upper limb has no motor-evoked potential (MEP−) on TMS, which imaging
alone cannot tell, so the summary says what the asymmetry would mean in that
case and what else is needed.
"""

DISCLAIMER = ("Research use only — not a medical device. Not for diagnosis or treatment "
              "decisions.")

REFERENCES = {
    "stinear2007": ("Stinear CM, Barber PA, Smale PR, Coxon JP, Fleming MK, Byblow WD. "
                    "Functional potential in chronic stroke patients depends on corticospinal "
                    "tract integrity. Brain 2007;130:170–180. doi:10.1093/brain/awl333"),
    "stinear2012": ("Stinear CM, Barber PA, Petoe M, Anwar S, Byblow WD. The PREP algorithm "
                    "predicts potential for upper limb recovery after stroke. Brain "
                    "2012;135:2527–2535. doi:10.1093/brain/aws146"),
    "werring2000": ("Werring DJ, Toosy AT, Clark CA, et al. Diffusion tensor imaging can detect "
                    "and quantify corticospinal tract degeneration after stroke. J Neurol "
                    "Neurosurg Psychiatry 2000;69:269–272. doi:10.1136/jnnp.69.2.269"),
}

DEFAULT_PREP_PLIC_AI = 0.25

LMN_NOTE = ("Lower-motor-neuron involvement is not assessable by brain diffusion MRI.")


def prognosis_summary(localization, fa_ai_plic, *, prep_plic_ai=DEFAULT_PREP_PLIC_AI,
                      qc_reasons=()):
    """Summarise what the CST asymmetry means for motor recovery.

    Parameters
    ----------
    localization : dict from :func:`pipeline.localization.localize_damage`
    fa_ai_plic : float
        AI = (FA_L − FA_R)/(FA_L + FA_R) over the PLIC ROIs. Its magnitude equals
        Stinear's (FA_contra − FA_ipsi)/(FA_contra + FA_ipsi) when the lesion
        is on the side with the lower FA.
    prep_plic_ai : float
        PREP cut-off on the PLIC FA asymmetry (0.25 in Stinear et al. 2012).
    qc_reasons : sequence of str
        Why the CST could not be assessed, if it could not.

    Returns
    -------
    dict with ``category, summary, rationale (list), references (list),
    thresholds, disclaimer``.
    """
    refs = [REFERENCES["stinear2007"], REFERENCES["stinear2012"]]
    thresholds = {"prep_plic_ai": prep_plic_ai}
    if not localization.get("assessable", True):
        return {"category": "not_assessable",
                "summary": "The CST could not be assessed; no statement on UMN damage or "
                           "recovery is made.",
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
