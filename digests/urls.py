from rest_framework.routers import SimpleRouter

from digests.apis import RecipientDigestScheduleViewSet, WeeklyDigestViewSet

# Included at api/.
router = SimpleRouter(trailing_slash=True)
router.register("digest-schedules", RecipientDigestScheduleViewSet, basename="digest-schedule")
router.register("digests", WeeklyDigestViewSet, basename="digest")

urlpatterns = router.urls
