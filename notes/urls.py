from django.urls import path
from rest_framework.routers import SimpleRouter

from notes.apis import NoteImportApi, NoteImportDetailApi, NoteViewSet

router = SimpleRouter(trailing_slash=True)
router.register("", NoteViewSet, basename="note")
# Before the router: its detail route would take "import" for a note id.
urlpatterns = [
    path("import/", NoteImportApi.as_view(), name="note-import"),
    path("import/<int:import_id>/", NoteImportDetailApi.as_view(), name="note-import-detail"),
    *router.urls,
]
