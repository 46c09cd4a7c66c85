"""HL7: orders in over MLLP (ORM^O01, OMI^O23 -> fetch orders), results out (ORU^R01 over MLLP, FHIR).

``mllp`` frames and the listener; ``v2`` escaping, headers and ACKs; ``inbound`` checks and answers each
message; ``orders`` reads orders, matches [[hl7.rules]] and records them (``order_received``);
``content`` and ``fhir`` say what a result holds; ``results`` is the outbox that sends it.
"""
