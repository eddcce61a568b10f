from rest_framework.routers import SimpleRouter

from notes.apis import NoteViewSet

router = SimpleRouter(trailing_slash=True)
router.register("", NoteViewSet, basename="note")
urlpatterns = router.urls
