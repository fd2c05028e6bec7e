"""Pascal VOC (:mod:`.voc`) and COCO 2017 instances (:mod:`.coco`): validating loaders, checks
before launch, synthetic trees."""
