"""The operator side over the broker alone: ``edge-agent fleet`` (:mod:`.cli` over
:mod:`.controller`), the local fleet simulation ``edge-agent sim`` (:mod:`.sim`) and
the demonstration ``edge-agent demo`` (:mod:`.demo`)."""
